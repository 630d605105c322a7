"""chatmaild: the daemons a chatmail relay's Dovecot and MTA talk to."""
