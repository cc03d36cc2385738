"""Broker fixtures: a real mosquitto on a free port, started and stopped by the test."""
