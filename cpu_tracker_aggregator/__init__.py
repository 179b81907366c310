"""Aggregator role: polls members' reports, checks each, publishes the network mean with its interval."""
