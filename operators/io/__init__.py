"""Kafka IO for Beam on kafka-python, and the exactly-once task layer."""
