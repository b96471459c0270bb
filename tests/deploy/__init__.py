"""Tests of edgeq deploy, the transports, the on-device runner and the report."""
