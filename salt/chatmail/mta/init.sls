{#- The MTA is pluggable: chatmail.mta names the sub-state (postfix, opensmtpd). #}
{%- from "chatmail/map.jinja" import chatmail with context %}
include:
  - chatmail.mta.{{ chatmail.mta }}
