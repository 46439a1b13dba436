"""Judging answers: the scorecard, safety claims, the gate, and the scorecard's own meta-evaluation."""
