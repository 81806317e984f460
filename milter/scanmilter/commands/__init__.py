"""The operator's commands: explain, selftest, postfix-check, the quarantine command, and the MTA
side of the milter protocol that selftest and postfix-check speak. They read the configuration
and use the daemon's stages (policy, pipeline, scanners, quarantine), but never import the
daemon's lifecycle (app.py) or pymilter's Milter: they run as other users, on other machines,
with no milter loop."""
