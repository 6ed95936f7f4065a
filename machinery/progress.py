"""What a long run shows while it works: tqdm's bar for minutes of scoring, train.py's progress
line, and messages that start a line of their own after it.
"""
import sys
import time

from tqdm import tqdm  # installed with huggingface_hub


def progress(iterable, what, total=None):
    """tqdm's bar over iterable on stderr, for work that takes minutes (eval.py's scoring, the
    anatomy of an adapter). On a terminal it redraws in place; in a log file it writes a line at
    most every 30 seconds, so a log shows the work going on without filling up. Work done
    within 10 seconds shows nothing."""
    # delay: nothing at all for work done within 10 s (most validations, every test)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=what, total=total, file=sys.stderr, leave=False, delay=10)
    return tqdm(iterable, desc=what, total=total, file=LineFile(sys.stderr), mininterval=30,
                delay=10, ascii=True)


class LineFile:
    """A stream that ends each of tqdm's redraws (which start with \\r) as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


class Clock:
    """train.py's speed and progress line, for one epoch. On a terminal one line is rewritten in
    place after every step; in a log file a line after the first step, then one at least every
    EVERY seconds, and the epoch's last step: a slow CPU still shows it is alive."""
    EVERY = 30.0

    def __init__(self, epoch, steps):
        self.epoch, self.steps = epoch, steps
        self.start, self.tokens, self.done, self.shown = time.time(), 0, 0, None

    def tick(self, tokens):
        """Count one step of `tokens` tokens; returns the epoch's tokens per second so far."""
        self.tokens, self.done = self.tokens + tokens, self.done + 1
        return self.tokens / max(time.time() - self.start, 1e-9)

    def show(self, i, loss, alpha, epochs, final=False):
        global _line_open
        now = time.time()
        left = (now - self.start) / self.done * (self.steps - i)  # this session's pace
        line = (f"epoch {self.epoch + 1}/{epochs} step {i}/{self.steps} loss {loss:.4f} "
                f"alpha {alpha:g} {self.tokens / max(now - self.start, 1e-9):.0f} tok/s, "
                f"epoch ends in {duration(left)}")
        final = final or i == self.steps
        if sys.stderr.isatty():
            print("\r" + line + "\033[K", end="\n" if final else "", file=sys.stderr, flush=True)
            _line_open = not final
        elif final or self.shown is None or now - self.shown >= self.EVERY:
            print(line, file=sys.stderr, flush=True)
            self.shown = now


def duration(seconds):
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


_line_open = False  # a progress line on the terminal still waits for its newline


def say(message):
    """A line of its own on stderr, even after an open progress line."""
    global _line_open
    print(("\n" if _line_open else "") + message, file=sys.stderr, flush=True)
    _line_open = False
