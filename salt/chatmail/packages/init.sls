{#- Distribution packages for every component, in one transaction. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set p = chatmail.pkgs %}
{#- upstream's Dovecot .debs come from files (chatmail.dovecot.packages), not from apt #}
{%- set dovecot = p.dovecot if chatmail.dovecot.packages != "upstream" else [] %}
{%- set wanted = p.base + p.python + p[chatmail.mta] + dovecot + p.web + p.resolver %}
{%- if chatmail.dkim.enabled and chatmail.dkim.signer == "opendkim" %}
{%-   set wanted = wanted + p.dkim %}
{%- endif %}
{%- if chatmail.tls.mode == "acme" %}
{%-   set wanted = wanted + p[chatmail.tls.acme_client] %}
{%- endif %}
{%- if chatmail.dovecot.pin_file %}

include:
  - chatmail.dovecot.packages
{%- endif %}

chatmail-packages:
  pkg.installed:
    - pkgs: {{ wanted | unique | list | json }}
{%- if chatmail.dovecot.pin_file %}
    - require:
      - sls: chatmail.dovecot.packages
{%- endif %}
{%- if chatmail.pkg_install_recommends is not none %}
    - install_recommends: {{ chatmail.pkg_install_recommends }}
{%- endif %}
