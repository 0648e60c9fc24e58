"""Prompt sets as a whole: their published contract (bundle) and bulk export and import."""
