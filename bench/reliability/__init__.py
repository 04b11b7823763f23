"""The reliability benchmark (`python -m bench.reliability`): issue 9's fault-isolation figures.

__main__    options, the order of sections, the JSON file
report      the printed report and its summary line
common      a section's figures and goals; starting pplex and workers; admin API, RSS, log
clients     client swarms in their own process: closed-loop pingers, open-loop soak clients
pushworker  the worker that pushes at a never-reading client
slow        section "slow": a never-reading client while 100 others ping
soak        section "soak": workers killed and stopped under 1,000 clients; every message accounted
fuzz        section "fuzz": fuzzed frames through pplex and into the framing plugins
steady      section "steady": RSS under a steady pipelined load; the admin API with 5,000 clients
"""
