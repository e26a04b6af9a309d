"""Offline dataset preparation: tokenise text, pack sequences, write WebDataset shards."""
