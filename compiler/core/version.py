"""fxopt's version, in one place: setup.py, fxopt.__version__ and saved files read it."""
VERSION = "0.1.0"
