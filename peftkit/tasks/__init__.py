"""Task kinds: one file each, with preprocessing, collator and metrics."""
