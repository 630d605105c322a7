{#- Distribution packages for every component, in one transaction. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set p = chatmail.pkgs %}
{%- set wanted = p.base + p.python + p[chatmail.mta] + p.dovecot + p.web + p.resolver %}
{%- if chatmail.dkim.enabled and chatmail.dkim.signer == "opendkim" %}
{%-   set wanted = wanted + p.dkim %}
{%- endif %}
{%- if chatmail.tls.mode == "acme" %}
{%-   set wanted = wanted + p[chatmail.tls.acme_client] %}
{%- endif %}

chatmail-packages:
  pkg.installed:
    - pkgs: {{ wanted | unique | list | json }}
{%- if chatmail.pkg_install_recommends is not none %}
    - install_recommends: {{ chatmail.pkg_install_recommends }}
{%- endif %}
