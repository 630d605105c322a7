{#- unbound as the relay's resolver on loopback; /etc/resolv.conf points to it once it
    runs. chatmail.dns_forwarder sends every query to another resolver instead of
    recursing (tests; networks that block outgoing DNS). #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set r = chatmail.resolver %}

include:
  - chatmail.packages

{#- Services that own /etc/resolv.conf (Ubuntu's systemd-resolved) stop only at the very
    end, right before resolv.conf changes: until then this run's package and pip
    downloads still resolve through them. unbound does not need them gone (it listens on
    127.0.0.1 and ::1, systemd-resolved on 127.0.0.53). #}
{%- for service in r.disable_services %}

chatmail-resolver-disable-{{ service }}:
  service.dead:
    - name: {{ service }}
    - enable: False
    - order: last
    - require:
      - service: chatmail-resolver-service
    - require_in:
      - file: chatmail-resolver-resolv-conf-link
{%- endfor %}

chatmail-resolver-config:
  file.managed:
    - name: {{ r.config }}
    - source: salt://chatmail/resolver/files/unbound.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: unbound-checkconf
    - require:
      - pkg: chatmail-packages

chatmail-resolver-service:
  service.running:
    - name: {{ chatmail.service.unbound }}
    - enable: True
    - watch:
      - file: chatmail-resolver-config

{#- A symlink (systemd-resolved, resolvconf) would be written through: replace it. #}
chatmail-resolver-resolv-conf-link:
  file.absent:
    - name: {{ r.resolv_conf }}
    - onlyif: test -L {{ r.resolv_conf }}
    # last: package and pip downloads of this run still use the resolver that worked
    - order: last
    - require:
      - service: chatmail-resolver-service

chatmail-resolver-resolv-conf:
  file.managed:
    - name: {{ r.resolv_conf }}
    - contents: |
        # Managed by Salt (chatmail formula): the local unbound.
        nameserver 127.0.0.1
    - mode: "0644"
    - order: last
    - require:
      - file: chatmail-resolver-resolv-conf-link
      - service: chatmail-resolver-service
