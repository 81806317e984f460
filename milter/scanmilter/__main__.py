"""python -m scanmilter"""
import sys

from scanmilter.cli import main

sys.exit(main())
