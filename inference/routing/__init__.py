"""Choosing a host of the fleet for each call: filter, score, pick, as small policies tested on their own.

``conversation`` finds the key of a conversation's prefix, ``rendezvous`` ranks hosts for a key the same way in
every gateway process, ``memory`` estimates which prefixes each host's prompt cache holds, and ``picker`` puts
them together with the hosts' health, models and load.
"""
