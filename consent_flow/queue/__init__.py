"""Adapters that carry events: the envelope and bus, arq job queueing, the refresh schedule."""
