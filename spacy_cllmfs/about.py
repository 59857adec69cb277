__title__ = "spacy-cllmfs"
__version__ = "0.1.0"
