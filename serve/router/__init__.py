"""The plain asyncio job service: submission, scheduling, admission, journal, job state."""
