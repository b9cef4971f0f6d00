"""Small I/O modules, one job each: adapter reading, checkpoint reading, sharded writing."""
