"""Tests of docsite/ and docs/."""
