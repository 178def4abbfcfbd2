"""Tests of dataset/."""
