# The agent's log lines in a bounded ring in RAM, for c8y_LogfileRequest (oplog.py).
#
# Every line the agent logs (agent.log) is kept with its time (Unix seconds) until the ring's
# size in characters is used up; then the oldest lines go. A line is cut to MAX_LINE characters.
# Secrets (the device's password, the bootstrap password, the WLAN password: State.secret) are
# replaced by "***" before a line is kept, so an uploaded log never holds one.
from .state import now

MAX_LINE = 160
MAX_SECRETS = 8


class Ring:
    def __init__(self, size=2048):
        self.size = size
        self.used = 0
        self.items = []  # [(Unix seconds, text)], oldest first
        self._secrets = []
        self.dropped = 0  # lines pushed out since the start

    def mask(self, secret):
        secret = str(secret)
        if len(secret) >= 4 and secret not in self._secrets:
            if len(self._secrets) >= MAX_SECRETS:
                self._secrets.pop(0)
            self._secrets.append(secret)

    def clean(self, text):
        """text with every registered secret replaced by "***" (also applied when lines are
        read: a secret registered after a line was kept is masked all the same)."""
        for sec in self._secrets:
            if sec in text:
                text = text.replace(sec, "***")
        return text

    def add(self, text, t=None):
        text = self.clean(str(text))
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE - 3] + "..."
        self.items.append((now() if t is None else t, text))
        self.used += len(text)
        while self.used > self.size and len(self.items) > 1:
            self.used -= len(self.items.pop(0)[1])
            self.dropped += 1

    def __len__(self):
        return len(self.items)

    def lines(self):
        """(Unix seconds, text) of every line kept, oldest first (a copy of the list)."""
        return list(self.items)
