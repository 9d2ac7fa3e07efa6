"""Tests of the strict header readers in serve/imaging/formats/."""
