"""The alignment-tax lab: `rlmerge eval`, `rlmerge plot`, greedy soups and `rlmerge lab`."""
