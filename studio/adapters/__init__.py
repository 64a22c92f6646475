"""Adapters: the PEFT LoRA adapter file (file.py, the one reader of its keys and settings, with its
names in names.py), the adapter library (library.py) and weighted combinations (combine.py).

Import the module you need (`from studio.adapters.file import AdapterFile`): this package imports
nothing itself, so asking for the file names does not load torch."""
