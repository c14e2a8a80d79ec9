"""`make bench`: blobstore measured against the machine's limits and against peers, as ratios."""
