{#- Resource ceilings for the distro daemons the relay runs (chatmail.limits): a systemd
    drop-in each. systemd applies changed cgroup limits on daemon-reload, so a change
    here restarts nothing. Our own units carry their limits themselves
    (files/limits.jinja); OpenBSD's rc.d daemons get login classes there. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/limits.jinja" import unit_limits with context %}
{%- if chatmail.init == "systemd" %}
{%-   set s = chatmail.service %}
{%-   set daemons = {"dovecot": s.dovecot ~ ".service", "unbound": s.unbound ~ ".service"} %}
{%-   if chatmail.mta == "postfix" %}
{%-     do daemons.update({"postfix": chatmail.postfix.instance_unit}) %}
{%-   else %}
{%-     do daemons.update({"opensmtpd": s.opensmtpd ~ ".service"}) %}
{%-   endif %}
{%-   if chatmail.web.server == "nginx" %}
{%-     do daemons.update({"nginx": s.nginx ~ ".service"}) %}
{%-   endif %}
{%-   if chatmail.dkim.enabled and chatmail.dkim.signer == "opendkim" %}
{%-     do daemons.update({"opendkim": s.opendkim ~ ".service"}) %}
{%-   endif %}
{%-   for name, unit in daemons | dictsort %}

chatmail-limits-{{ name }}:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/{{ unit }}.d/20-chatmail-limits.conf
    - makedirs: True
    - mode: "0644"
    - contents: |
        # Managed by Salt (chatmail formula): ceilings from chatmail.limits, so this
        # daemon cannot starve the rest of the relay.
        [Service]
        {{ unit_limits(name) | indent(8) }}
{%-   endfor %}

chatmail-limits-reload:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
{%-   for name in daemons | sort %}
      - file: chatmail-limits-{{ name }}
{%-   endfor %}
{%- endif %}
