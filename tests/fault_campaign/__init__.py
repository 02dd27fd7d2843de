"""The fault campaign (``python -m tests.fault_campaign``) and the property checks it shares with the
tests."""
