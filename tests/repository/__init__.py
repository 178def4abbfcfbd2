"""Tests of repository/."""
