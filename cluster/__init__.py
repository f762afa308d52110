"""Ray actors, chunk transport and the Serve app; filled by the cluster issue."""
