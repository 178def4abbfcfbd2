"""Tests of warmup/."""
