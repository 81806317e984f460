"""The smallest useful pymilter milter: adds one header and accepts. The Python floor in
`make bench`, and the stand-in milter of the stack's own self-test.
Usage: python tools/trivial_milter.py unix:/path/to.sock"""
import os
import sys

import Milter


class Trivial(Milter.Base):
    def eom(self):
        self.addheader("X-Trivial-Milter", "seen")
        return Milter.ACCEPT


if __name__ == "__main__":
    os.umask(0)                 # Postfix (another user) must reach the socket
    Milter.factory = Trivial
    Milter.set_flags(Milter.ADDHDRS)
    Milter.runmilter("trivial", sys.argv[1], 240)
