"""Tests of deploy/, docker/, the Dockerfile and compose."""
