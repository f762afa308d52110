"""Decode: the chunk pool of resident chunks, the LSA decode step and the decode loop."""
