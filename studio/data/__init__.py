"""The data side: reading documents, the teacher, building and importing instruction datasets."""
