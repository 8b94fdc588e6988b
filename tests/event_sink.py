"""`Collect`: the event sink the engine and driver tests hand to a driver for one request or conversation."""

import threading

import numpy as np


class Collect:
    """A sink: every event of one owner, and `finished` set at its last."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finished:
            self.finished.set()

    def codes(self):
        assert self.finished.wait(300), "no finished event"
        return np.concatenate([ev.codes for ev in self.events]).T
