"""serve.py: a checkpoint behind HTTP (LitServe) and a web page."""
