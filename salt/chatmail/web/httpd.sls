{#- OpenBSD's base web stack (web.server: httpd): httpd serves the pages, autoconfig and
    MTA-STS and answers port 80; relayd ends TLS on 443 and sends POST /new to the control
    API. Both configs are checked (-n) before they go live; a change reloads the daemon.
    Included by chatmail.web, which keeps the parts every web server shares. -#}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set w = chatmail.web %}

chatmail-web-config:
  file.managed:
    - name: {{ w.config }}
    - source: salt://chatmail/web/files/openbsd/httpd.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: httpd -n -f
    - require:
      - sls: chatmail.tls

chatmail-web-relayd-config:
  file.managed:
    - name: {{ w.relayd_config }}
    - source: salt://chatmail/web/files/openbsd/relayd.conf.jinja
    - template: jinja
    - mode: "0600"
    - check_cmd: relayd -n -f
    - require:
      - sls: chatmail.tls

{#- pf.conf is the operator's: the relay's rules come as an example to merge. #}
chatmail-web-pf-example:
  file.managed:
    - name: {{ w.pf_example }}
    - source: salt://chatmail/web/files/openbsd/pf.conf.example.jinja
    - template: jinja
    - makedirs: True
    - mode: "0644"

chatmail-web-service:
  service.running:
    - name: {{ chatmail.service.httpd }}
    - enable: True
    - reload: True
    - require:
      - file: chatmail-web-autoconfig
      - file: chatmail-web-mta-sts
      - file: chatmail-web-acme-webroot
      - file: chatmail-web-www-root
    - watch:
      - file: chatmail-web-config

chatmail-web-relayd-service:
  service.running:
    - name: {{ chatmail.service.relayd }}
    - enable: True
    - reload: True
    - require:
      - service: chatmail-web-service
    - watch:
      - file: chatmail-web-relayd-config
