"""Chapter: adapter formats and exports. Nothing in the core imports this folder.

    peft.py     PEFT's adapter folder, read and written
    merged.py   a Hugging Face model folder with the adapter folded into the weights
    cli.py      the command: python -m export --adapter out --format peft|merged --out DIR
"""
