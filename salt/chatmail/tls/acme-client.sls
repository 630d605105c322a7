{#- ACME with OpenBSD's acme-client(1) (tls.acme_client: acme-client): http-01 through
    httpd on port 80 (challengedir in httpd's chroot). acme-client exits 0 when it wrote a
    new certificate, 2 when the current one is still good, 1 on errors; only a new one is
    installed over the stand-in, and then the daemons reload (smtpd has no reload: it
    restarts). Needs public DNS and reachability from the CA: not exercised by tests. -#}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set tls = chatmail.tls %}
{%- set a = chatmail.acme_client %}
{%- set d = chatmail.mail_domain %}
{%- set s = chatmail.service %}
{%- set renew = "acme-client " ~ d ~ "; rc=$?; [ $rc -eq 0 ] && " ~ tls.install_script ~ "; [ $rc -ne 1 ]" %}

include:
  - chatmail.web

chatmail-tls-acme-config:
  file.managed:
    - name: {{ a.config }}
    - source: salt://chatmail/tls/files/acme-client.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: acme-client -n -f

chatmail-tls-acme-dirs:
  file.directory:
    - names:
      - {{ a.cert.rsplit("/", 1)[0] }}:
        - mode: "0755"
      - {{ a.key.rsplit("/", 1)[0] }}:
        - mode: "0700"
    - makedirs: True

chatmail-tls-install-script:
  file.managed:
    - name: {{ tls.install_script }}
    - makedirs: True
    - mode: "0755"
    - contents: |
        #!/bin/sh
        # Managed by Salt (chatmail formula): put acme-client's new certificate where
        # relayd, httpd, smtpd and Dovecot read it, then let them pick it up.
        set -eu
        install -m 0600 -o root -g wheel {{ a.key }} {{ tls.key }}.new
        install -m 0644 -o root -g wheel {{ a.cert }} {{ tls.cert }}.new
        mv -f {{ tls.key }}.new {{ tls.key }}
        mv -f {{ tls.cert }}.new {{ tls.cert }}
        for service in {{ s.dovecot }} {{ s.httpd }} {{ s.relayd }}; do
            rcctl reload "$service" || true
        done
        rcctl restart {{ s.opensmtpd }} || true

chatmail-tls-acme-issue:
  cmd.run:
    - name: {{ renew | json }}
    - creates: {{ a.cert }}
    - require:
      - file: chatmail-tls-acme-config
      - file: chatmail-tls-acme-dirs
      - file: chatmail-tls-install-script
      - service: chatmail-web-service

chatmail-tls-acme-renew:
  cron.present:
    - name: {{ renew | json }}
    - identifier: chatmail-acme-client
    - user: root
    - hour: "{{ a.cron_hour }}"
    - minute: "{{ a.cron_minute }}"
    - require:
      - cmd: chatmail-tls-acme-issue
