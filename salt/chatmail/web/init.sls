{#- nginx: 443 multiplexed by ALPN (imap and smtp to loopback listeners of Dovecot and
    Postfix, else the HTTPS server on 127.0.0.1:8443), each connection with a PROXY header
    carrying the client's address; autoconfig, MTA-STS, /new -> control API (rate-limited
    per client), the web pages, and port 80 for ACME http-01 and the redirect to https. A config change reloads nginx: workers
    finish their requests and new listeners are opened by the master. #}
{%- from "chatmail/map.jinja" import chatmail with context %}

include:
  - chatmail.packages
  - chatmail.tls
{%- if chatmail.web.server != "nginx" %}
  {#- another web server (OpenBSD: httpd + relayd) brings its own config and service #}
  - chatmail.web.{{ chatmail.web.server }}
{%- endif %}

chatmail-web-wellknown-dir:
  file.directory:
    - name: {{ chatmail.paths.wellknown }}
    - makedirs: True
    - mode: "0755"

chatmail-web-acme-webroot:
  file.directory:
    - name: {{ chatmail.paths.acme_webroot }}
    - makedirs: True
    - mode: "0755"

chatmail-web-www-root:
  file.directory:
    - name: {{ chatmail.paths.www_root }}
    - makedirs: True
    - mode: "0755"

chatmail-web-autoconfig:
  file.managed:
    - name: {{ chatmail.paths.wellknown }}/config-v1.1.xml
    - source: salt://chatmail/web/files/autoconfig.xml.jinja
    - template: jinja
    - mode: "0644"
    - require:
      - file: chatmail-web-wellknown-dir

chatmail-web-mta-sts:
  file.managed:
    - name: {{ chatmail.paths.wellknown }}/mta-sts.txt
    - source: salt://chatmail/web/files/mta-sts.txt.jinja
    - template: jinja
    - mode: "0644"
    - require:
      - file: chatmail-web-wellknown-dir

{%- if chatmail.web.server == "nginx" %}

chatmail-web-config:
  file.managed:
    - name: {{ chatmail.web.config }}
    - source: salt://chatmail/web/files/nginx.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: nginx -q -t -c
    - require:
      - pkg: chatmail-packages
      - sls: chatmail.tls

chatmail-web-service:
  service.running:
    - name: {{ chatmail.service.nginx }}
    - enable: True
    - reload: True
    - require:
      - file: chatmail-web-autoconfig
      - file: chatmail-web-mta-sts
      - file: chatmail-web-acme-webroot
      - file: chatmail-web-www-root
    - watch:
      - file: chatmail-web-config
{%- endif %}
