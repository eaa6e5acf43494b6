"""The command-line programs: train.py and the user tools of tools/.

Each module is one program (absl flags; `console_entry()` is its console
script, `python -m official_shapemask.cli.<name>` runs it too);
`train.py` and `tools/<name>.py` in a checkout call the same functions.
"""
