"""Tests of loadtest/."""
