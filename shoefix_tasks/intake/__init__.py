"""Intake: from an inbox file to accepted, ledgered records (collect -> validate)."""
