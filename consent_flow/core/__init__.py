"""The pure core: states, events, the transition table, records and timing. No I/O."""
