"""Every command's argparse in one place: `videoxl chat` (main.py), serve, batch, the shared options and the console."""
