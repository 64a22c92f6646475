"""Merging adapters into their base, verifying merges, and zips for download."""
