{#- The chatmail relay. One state per concern; each can also be applied alone
    (`state.apply chatmail.dovecot`), pulling in what it needs. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
include:
  - chatmail.checks
  - chatmail.users
  # first: upstream's daemons stop before ours take their ports (a no-op elsewhere)
  - chatmail.upstream
  - chatmail.packages
  - chatmail.tls
  - chatmail.chatmaild
{%- if chatmail.dkim.enabled %}
  - chatmail.dkim
{%- endif %}
  - chatmail.dovecot
  - chatmail.turn
  - chatmail.mta
  - chatmail.web
  - chatmail.resolver
  - chatmail.expiry
{%- if chatmail.api.enabled %}
  - chatmail.api
{%- endif %}
  - chatmail.www
  - chatmail.logging
  - chatmail.limits
{%- if chatmail.api.enabled %}
  - chatmail.selfcheck
{%- endif %}
