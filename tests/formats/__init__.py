"""Tests of the strict header readers in serve/formats/."""
