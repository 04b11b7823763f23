"""Run the example's tests from a checkout, installed or not: put the package on the path."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
